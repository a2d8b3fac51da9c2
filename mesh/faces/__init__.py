"""The faces: mesh.Client, meshctl, its tables and progress bar, and the public test helper."""
