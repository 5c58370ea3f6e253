"""The tiled engine: plans tiles on the output chunk grid, reads them with a halo, runs the
resident kernel on Dask, stitches (crop or blend), records progress for resuming, and builds
pyramids. It knows kernels only by their declared traits and steps not at all."""
