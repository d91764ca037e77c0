from qkv.cli.main import main

main()
