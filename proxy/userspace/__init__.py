"""--proxy-mode=userspace: Services served by an asyncio proxy in the daemon (proxy/userspace/README.md)."""
