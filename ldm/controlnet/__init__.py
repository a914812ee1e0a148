"""ControlNet at sampling time: the flags, their checks and the build of each net (options.py), which ControlNets act
at a denoising call (stack.py), and the hint images (hints.py). The nn.Module itself, a config target, stays at
ldm/modules/controlnet.py."""
