"""Data: the phantom SCM, dataset loaders, scan reading, views and augmentation."""
