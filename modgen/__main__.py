from modgen.cli import main

main()
