//! The file-system edge: scanning and hashing (`scan`), watching (`watch`), safe writes
//! (`apply`), opening and creating below a root without following symlinks (`beneath`),
//! ignore rules (`ignore`), the XML validation gate (`xml`) and the few threads that bulk file
//! work is spread over (`par`).

pub mod apply;
pub mod beneath;
pub mod ignore;
pub mod own;
pub mod par;
pub mod scan;
pub mod watch;
pub mod xml;
