//! Prints what a `qmp_args` input runs: each command, its arguments and the reply.
//! `cargo run --example trace_qmp_args -- FILE...`

fn main() {
    for file in std::env::args().skip(1) {
        let data = std::fs::read(&file).expect("input file");
        println!("== {file}");
        minivmm_fuzz::qmp_args::qmp_args_traced(&data, &mut |cmd, args, reply| {
            println!("-> {cmd} {}", serde_json::Value::Object(args.clone()));
            print!("<- {reply}");
        });
    }
}
