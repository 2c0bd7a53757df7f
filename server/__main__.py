"""``python -m server``: run the settlement service (see ``server.app.serve``)."""
import sys

from server.app import serve

sys.exit(serve())
