"""The service layer: container rules, state, quotas, events and terminal sessions (asyncio)."""
