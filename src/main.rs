//! The `kvt` binary: everything lives in the library.

fn main() {
    std::process::exit(kvt::cli::main_with(kvt::stages::register));
}
