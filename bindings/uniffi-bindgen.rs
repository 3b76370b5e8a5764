//! The workspace's own `uniffi-bindgen`, so the generator always matches the uniffi version the library uses.
fn main() {
    uniffi::uniffi_bindgen_main()
}
