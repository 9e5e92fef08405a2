"""One module per page family: the failure report's pages (verdict, details, gradients,
losses, representations, prototypes, saturation, batches, further evidence) and the
comparison's (overview, overlays), all drawn with the toolkit in :mod:`gradprobe.report`."""
