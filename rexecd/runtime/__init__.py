"""The runtime layer: images, rootfs, cgroups, network, storage, PTYs, spawner (no asyncio)."""
