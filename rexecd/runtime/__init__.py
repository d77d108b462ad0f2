"""The runtime layer: images, rootfs, cgroups, network, storage, PTYs and the spawner (no asyncio)."""
