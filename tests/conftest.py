pytest_plugins = ["peerkit.testing"]
