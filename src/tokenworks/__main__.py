from tokenworks.cli import main

main()
