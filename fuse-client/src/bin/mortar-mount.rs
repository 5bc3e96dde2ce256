fn main() {
    std::process::exit(mortar_fuse::mount::main());
}
