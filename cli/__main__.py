"""``python -m govshare.cli`` runs the ``govshare`` command."""

from govshare.cli.main import main

main()
