/// jemalloc: in the benchmark (bench/results) it cut tollgate's CPU per request by about
/// 7 % and its peak memory by about 30 % against glibc's allocator, which pingora's
/// per-request allocations lean on heavily.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
