"""The transport: the dispatcher (ROUTER to workers), the wire protocol on top of mesh.codecs.frames, chunk descriptors and the source role that ships bytes."""
