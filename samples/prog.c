/*
 * Sample program for the loader tests.  It prints "sample ok" and exits 0.
 *
 *   -DCALL=name      call this library function and print "call: <its result>"
 *   -DPLUGIN="name"  dlopen this file name (with or without a slash) and call its
 *                    sample_plugin function if it has one; a failed dlopen is printed, not fatal
 *
 * With the argument --objects it first prints "object: NAME" for every object mapped at
 * start-up (dl_iterate_phdr, i.e. the loader's l_name), so a test can see which files the
 * loader really took, also inside a packed root.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <string.h>

#ifdef CALL
const char *CALL(void);
#endif

static int print_object(struct dl_phdr_info *info, size_t size, void *data)
{
	int *seen = data;

	(void)size;
	/* The first object is the program itself: glibc names it "", musl by its path. */
	if ((*seen)++ > 0)
		printf("object: %s\n", info->dlpi_name);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--objects") == 0) {
		int seen = 0;

		dl_iterate_phdr(print_object, &seen);
	}

#ifdef CALL
	printf("call: %s\n", CALL());
#endif

#ifdef PLUGIN
	void *handle = dlopen(PLUGIN, RTLD_NOW);
	if (handle == NULL) {
		printf("dlopen failed: %s\n", dlerror());
	} else {
		const char *(*plugin)(void) = (const char *(*)(void))dlsym(handle, "sample_plugin");
		printf("plugin: %s\n", plugin != NULL ? plugin() : "(no sample_plugin)");
	}
#endif

	puts("sample ok");
	return 0;
}
