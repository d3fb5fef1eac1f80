//! Running one pod of the local platform as processes.
