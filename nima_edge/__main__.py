from nima_edge.cli import main

main()
