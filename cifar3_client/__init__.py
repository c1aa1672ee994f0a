"""The one TorchServe HTTP client (client.py), the server lifecycle (server.py) and its command line (cli.py).

Beside the serving core, never inside it and never importing torch: the UI image installs this package alone.
"""
