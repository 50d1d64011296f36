/*
 * Sample shared library for the loader tests.
 *
 *   -DFN=name   name of the exported function (default sample_lib); it returns its own name
 *   -DDEP=name  a function of another library that FN calls first: a real symbol dependency,
 *               not only a DT_NEEDED entry
 *
 * It includes no header, so "gcc -m32 -c" builds it without 32-bit libc headers.
 */
#ifndef FN
#define FN sample_lib
#endif

#define STR2(x) #x
#define STR(x) STR2(x)

#ifdef DEP
const char *DEP(void);
#endif

const char *FN(void)
{
#ifdef DEP
	DEP();
#endif
	return STR(FN);
}
