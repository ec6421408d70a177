//! Code that runs inside another process: the syscall-program executor and its builder.
