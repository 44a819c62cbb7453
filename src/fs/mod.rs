//! The file-system edge: scanning and hashing (`scan`), watching (`watch`), safe writes
//! (`apply`), ignore rules (`ignore`) and the XML validation gate (`xml`).

pub mod apply;
pub mod ignore;
pub mod scan;
pub mod watch;
pub mod xml;
