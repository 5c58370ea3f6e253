"""Steps: what a user runs (apply a kernel, denoise, segment + stitch + measure, train,
convert). Each is a short function over the engine; the coming composition API composes them."""
