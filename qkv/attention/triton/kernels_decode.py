def decode_forward(*a):
    raise NotImplementedError
