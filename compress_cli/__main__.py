from compress_cli.cli import main

main()
