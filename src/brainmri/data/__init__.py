"""Data preparation: ingest (image folders, scanner files, label tables), duplicates, the split,
balancing with augmentation, box annotations, the data report and the input gate. Imports only core."""
