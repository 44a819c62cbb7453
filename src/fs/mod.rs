//! The file-system edge: scanning and hashing (`scan`), watching (`watch`), safe batched
//! writes to a folder (`apply`, one submodule per step), durable whole-file writes outside the
//! folders such as the daemon's state files (`atomic`), opening and creating below a root
//! without following symlinks (`beneath`), ignore rules (`ignore`), the XML validation gate
//! (`xml`), the engine's own writes told to its watcher (`own`) and the few threads that bulk
//! file work is spread over (`par`).

pub mod apply;
pub mod atomic;
pub mod beneath;
pub mod ignore;
pub mod own;
pub mod par;
pub mod scan;
pub mod watch;
pub mod xml;
