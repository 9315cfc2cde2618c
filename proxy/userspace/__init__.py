"""--proxy-mode=userspace: Services served by an asyncio proxy in the daemon.

See proxy/userspace/README.md."""
