from c5snn.cli import main

main()
