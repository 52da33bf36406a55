from nbfunc.cli.main import main

main()
