"""One module per ``dnfer`` subcommand (``add_parser`` + ``run``)."""
