/* For tests/test_isa.py, preloaded (LD_PRELOAD) into a test's subprocess: MKL (linked into torch) asks
   these two functions whether it runs on an Intel CPU and takes a generic code path when not. Answering
   yes makes it dispatch by the CPU's instruction set as on an Intel CPU: on an AMD CPU with AVX-512 it
   then runs the AVX-512 kernels an Intel Xeon gets, so the checks see both MKL paths on one machine. */
int mkl_serv_intel_cpu(void) { return 1; }
int mkl_serv_intel_cpu_true(void) { return 1; }
