"""Read image folders and IDX files; the train and eval preprocessing."""
