"""Backend op families: one file each (kernels → launcher → torch.library registration)."""
