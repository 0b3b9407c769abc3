from obdfuse.cli import main

main()
