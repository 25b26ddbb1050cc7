fn main() {
    println!("paxoskv {}", env!("CARGO_PKG_VERSION"));
}
