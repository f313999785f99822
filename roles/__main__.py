from roles.host import main

main()
