"""Wire format: frames, compression, record splitting. Pure functions, no sockets."""
