import os
import sys

# tests/ helpers (nodeproc, dns_server) import as top-level modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
