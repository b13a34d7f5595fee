/* fastlora._prebound_c: the hit path of fastlora.ops._prebound.launch_keyed in C.
 *
 * A planned Triton launch from Python costs its signature (the tensors' dtypes and 16-byte
 * alignments, the free ints' specialisation classes), a dict look-up and the plan's call into the
 * compiled kernel's C launcher: about 6 us of bytecode for _lora_gemm_kernel's 44 arguments
 * (census host path, quiet CPU), a few times over per training step. This module does the same
 * steps without the interpreter. It holds no state: the plan table, the plans and Triton's runtime
 * knobs are the Python module's, passed in on every call, and the signature it builds is the one
 * _prebound._keyed_signature builds (tests/test_prebound.py checks the two agree), so a launch
 * whose plan is missing here is planned by the Python path under the same key.
 *
 * Plain CPython (no torch headers): a tensor's data_ptr and dtype are read through their Python
 * attributes, so one build serves every torch. Valid C and C++ (torch's BuildExtension, which builds
 * it beside fastlora._C, may compile it as C++). Optional: without it (no compiler at install,
 * FASTLORA_PREBOUND_C=0) the Python path runs, with the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *str_data_ptr, *str_dtype, *str_meta, *str_tail, *str_get_stream, *str_device_index,
    *str_kernel, *str_launcher, *str_function, *str_packed, *str_launch_metadata, *str_enter, *str_exit,
    *str_calls;

/* How Triton's binder types an int (as _prebound._width): 0 i32, 1 i64, 2 anything wider. */
static int int_width(PyObject *v, long long *value, int *overflow) {
    *value = PyLong_AsLongLongAndOverflow(v, overflow);
    if (*value == -1 && PyErr_Occurred()) return -1;
    if (*overflow) return 2;
    return (*value >= -2147483648LL && *value < 2147483648LL) ? 0 : 1;
}

/* Is a launch hook absent: None, or a HookChain (triton 3.6-3.8) whose list of calls is empty?
 * 1 yes, 0 no, -1 an error set. */
static int no_hook(PyObject *hook) {
    if (hook == Py_None) return 1;
    PyObject *calls = PyObject_GetAttr(hook, str_calls);
    if (calls == NULL) {  /* as getattr(hook, "calls", None): only a missing attribute means "a hook" */
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    int empty = PyList_Check(calls) && PyList_GET_SIZE(calls) == 0;
    Py_DECREF(calls);
    return empty;
}

/* The signature ("keyed", id, device, key, options, dtypes, aligned, classes), or NULL with
 * *no_storage set when a tensor has no data pointer (meta, fake: the caller takes Triton's path). */
static PyObject *signature(PyObject *head, PyObject *key, PyObject *options, PyObject *tensors, PyObject *args,
                           PyObject *nospec, PyObject *loose, int *no_storage) {
    Py_ssize_t n = PyTuple_GET_SIZE(tensors);
    unsigned long long ored = 0;
    unsigned long long small[64];
    unsigned long long *pointers =
        n <= 64 ? small : (unsigned long long *)PyMem_Malloc(n * sizeof(unsigned long long));
    PyObject *dtypes = NULL, *aligned = NULL, *classes = NULL, *sig = NULL;
    Py_ssize_t n_nospec = PyTuple_GET_SIZE(nospec), n_loose = PyTuple_GET_SIZE(loose);
    if (pointers == NULL) return PyErr_NoMemory();
    dtypes = PyTuple_New(n);
    if (dtypes == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyTuple_GET_ITEM(tensors, i);
        PyObject *p = PyObject_CallMethodNoArgs(t, str_data_ptr);
        if (p == NULL) {
            if (PyErr_ExceptionMatches(PyExc_RuntimeError)) {
                PyErr_Clear();
                *no_storage = 1;
            }
            goto done;
        }
        pointers[i] = PyLong_AsUnsignedLongLongMask(p);
        Py_DECREF(p);
        if (pointers[i] == (unsigned long long)-1 && PyErr_Occurred()) goto done;
        ored |= pointers[i];
        PyObject *dtype = PyObject_GetAttr(t, str_dtype);
        if (dtype == NULL) goto done;
        PyTuple_SET_ITEM(dtypes, i, dtype);
    }
    if (!(ored & 15)) {
        aligned = Py_NewRef(Py_True);
    } else {
        aligned = PyTuple_New(n);
        if (aligned == NULL) goto done;
        for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(aligned, i, PyBool_FromLong(!(pointers[i] & 15)));
    }
    classes = PyTuple_New(n_nospec + n_loose);
    if (classes == NULL) goto done;
    for (Py_ssize_t i = 0; i < n_nospec + n_loose; i++) {
        int is_nospec = i < n_nospec;
        Py_ssize_t pos = PyLong_AsSsize_t(PyTuple_GET_ITEM(is_nospec ? nospec : loose, is_nospec ? i : i - n_nospec));
        if (pos == -1 && PyErr_Occurred()) goto done;
        if (pos < 0 || pos >= PyTuple_GET_SIZE(args)) {
            PyErr_Format(PyExc_IndexError, "argument position %zd out of range for %zd arguments", pos,
                         PyTuple_GET_SIZE(args));
            goto done;
        }
        PyObject *v = PyTuple_GET_ITEM(args, pos);
        long long value;
        int overflow;
        int width = int_width(v, &value, &overflow);
        if (width < 0) goto done;
        if (is_nospec) {  /* a do_not_specialize int: its width alone */
            PyObject *w = PyLong_FromLong(width);
            if (w == NULL) goto done;
            PyTuple_SET_ITEM(classes, i, w);
            continue;
        }
        int divisible;
        if (overflow) {  /* Python's modulo on a wide int (never a row count in practice) */
            PyObject *sixteen = PyLong_FromLong(16);
            PyObject *rem = sixteen ? PyNumber_Remainder(v, sixteen) : NULL;
            Py_XDECREF(sixteen);
            if (rem == NULL) goto done;
            divisible = PyLong_AsLong(rem) == 0;
            Py_DECREF(rem);
        } else {
            divisible = value % 16 == 0;
        }
        PyObject *cls = Py_BuildValue("(NNi)", PyBool_FromLong(!overflow && value == 1), PyBool_FromLong(divisible),
                                      width);
        if (cls == NULL) goto done;
        PyTuple_SET_ITEM(classes, i, cls);
    }
    sig = PyTuple_Pack(8, PyTuple_GET_ITEM(head, 0), PyTuple_GET_ITEM(head, 1), PyTuple_GET_ITEM(head, 2), key,
                       options, dtypes, aligned, classes);
done:
    if (pointers != small) PyMem_Free(pointers);
    Py_XDECREF(dtypes);
    Py_XDECREF(aligned);
    Py_XDECREF(classes);
    return sig;
}

/* plan(args, grid) as _prebound._Plan.__call__: returns the plan's kernel. */
static PyObject *call_plan(PyObject *plan, PyObject *args, PyObject *grid, PyObject *runtime) {
    PyObject *meta = NULL, *tail = NULL, *get_stream = NULL, *index = NULL, *kernel = NULL, *launcher = NULL,
             *function = NULL, *packed = NULL, *stream = NULL, *full = NULL, *enter = NULL, *leave = NULL,
             *metadata = NULL, *call_args = NULL, *result = NULL, *ret = NULL, *grid_ref = Py_NewRef(grid);
    PyObject *fixed[9];
    Py_ssize_t size, n_full;
    int no_enter, no_leave;
    long g[3] = {1, 1, 1};
    if ((meta = PyObject_GetAttr(plan, str_meta)) == NULL) goto done;
    if (PyCallable_Check(grid_ref)) {
        PyObject *evaluated = PyObject_CallOneArg(grid_ref, meta);
        if (evaluated == NULL) goto done;
        Py_SETREF(grid_ref, evaluated);
    }
    size = PySequence_Size(grid_ref);
    if (size < 0) goto done;
    if (size == 0) {  /* as grid[0] in Python */
        PyErr_SetString(PyExc_IndexError, "the launch grid is empty");
        goto done;
    }
    for (Py_ssize_t i = 0; i < size && i < 3; i++) {
        PyObject *item = PySequence_GetItem(grid_ref, i);
        if (item == NULL) goto done;
        g[i] = PyLong_AsLong(item);
        Py_DECREF(item);
        if (g[i] == -1 && PyErr_Occurred()) goto done;
    }
    if ((tail = PyObject_GetAttr(plan, str_tail)) == NULL) goto done;
    if ((get_stream = PyObject_GetAttr(plan, str_get_stream)) == NULL) goto done;
    if ((index = PyObject_GetAttr(plan, str_device_index)) == NULL) goto done;
    if ((stream = PyObject_CallOneArg(get_stream, index)) == NULL) goto done;
    if ((full = PySequence_Concat(args, tail)) == NULL) goto done;
    if ((kernel = PyObject_GetAttr(plan, str_kernel)) == NULL) goto done;
    if ((enter = PyObject_GetAttr(runtime, str_enter)) == NULL) goto done;
    if ((leave = PyObject_GetAttr(runtime, str_exit)) == NULL) goto done;
    no_enter = no_hook(enter);
    no_leave = no_enter < 0 ? -1 : no_hook(leave);
    if (no_enter < 0 || no_leave < 0) goto done;
    if (no_enter && no_leave) {
        /* Nothing to call: the C launcher skips None hooks, and nobody would read the metadata. */
        Py_SETREF(enter, Py_NewRef(Py_None));
        Py_SETREF(leave, Py_NewRef(Py_None));
        metadata = Py_NewRef(Py_None);
    } else {  /* as JITFunction.run: kernel.launch_metadata(grid, stream, *full) */
        PyObject *method = PyObject_GetAttr(kernel, str_launch_metadata);
        PyObject *head = method ? PyTuple_Pack(2, grid_ref, stream) : NULL;
        PyObject *margs = head ? PySequence_Concat(head, full) : NULL;
        metadata = margs ? PyObject_Call(method, margs, NULL) : NULL;
        Py_XDECREF(method);
        Py_XDECREF(head);
        Py_XDECREF(margs);
        if (metadata == NULL) goto done;
    }
    if ((launcher = PyObject_GetAttr(plan, str_launcher)) == NULL) goto done;
    if ((function = PyObject_GetAttr(plan, str_function)) == NULL) goto done;
    if ((packed = PyObject_GetAttr(plan, str_packed)) == NULL) goto done;
    n_full = PyTuple_GET_SIZE(full);
    if ((call_args = PyTuple_New(9 + n_full)) == NULL) goto done;
    fixed[0] = PyLong_FromLong(g[0]);
    fixed[1] = PyLong_FromLong(g[1]);
    fixed[2] = PyLong_FromLong(g[2]);
    fixed[3] = Py_NewRef(stream);
    fixed[4] = Py_NewRef(function);
    fixed[5] = Py_NewRef(packed);
    fixed[6] = Py_NewRef(metadata);
    fixed[7] = Py_NewRef(enter);
    fixed[8] = Py_NewRef(leave);
    for (int i = 0; i < 9; i++) {
        if (fixed[i] == NULL) {
            for (int j = i + 1; j < 9; j++) Py_XDECREF(fixed[j]);
            goto done;
        }
        PyTuple_SET_ITEM(call_args, i, fixed[i]);
    }
    for (Py_ssize_t i = 0; i < n_full; i++) PyTuple_SET_ITEM(call_args, 9 + i, Py_NewRef(PyTuple_GET_ITEM(full, i)));
    ret = PyObject_Call(launcher, call_args, NULL);
    if (ret == NULL) goto done;
    Py_DECREF(ret);
    result = Py_NewRef(kernel);
done:
    Py_XDECREF(meta);
    Py_XDECREF(tail);
    Py_XDECREF(get_stream);
    Py_XDECREF(index);
    Py_XDECREF(kernel);
    Py_XDECREF(launcher);
    Py_XDECREF(function);
    Py_XDECREF(packed);
    Py_XDECREF(stream);
    Py_XDECREF(full);
    Py_XDECREF(enter);
    Py_XDECREF(leave);
    Py_XDECREF(metadata);
    Py_XDECREF(call_args);
    Py_DECREF(grid_ref);
    return result;
}

/* Are the seven arguments of signature() (head, key, options, tensors, args, nospec, loose) of the
 * types it reads without checking? Raises TypeError naming `fn` if not. */
static int signature_args_ok(PyObject *const *sig_argv, const char *fn) {
    if (PyTuple_Check(sig_argv[0]) && PyTuple_GET_SIZE(sig_argv[0]) == 3 && PyTuple_Check(sig_argv[3]) &&
        PyTuple_Check(sig_argv[4]) && PyTuple_Check(sig_argv[5]) && PyTuple_Check(sig_argv[6])) {
        return 1;
    }
    PyErr_Format(PyExc_TypeError, "%s(): head must be a 3-tuple; tensors, args, nospec and loose tuples", fn);
    return 0;
}

PyDoc_STRVAR(launch_doc,
             "launch(plans, head, key, options, tensors, args, nospec, loose, grid, runtime) -> (launched, value)\n\n"
             "launch_keyed's hit path: the signature of the launch, then, if plans holds a plan for it, the plan's\n"
             "call (value: the plan's kernel, launched True). Otherwise launched is False and value is the\n"
             "signature, or None where a tensor has no storage.");

static PyObject *launch(PyObject *self, PyObject *const *argv, Py_ssize_t argc) {
    (void)self;
    if (argc != 10) {
        PyErr_SetString(PyExc_TypeError, "launch() takes 10 arguments");
        return NULL;
    }
    PyObject *plans = argv[0], *head = argv[1], *key = argv[2], *options = argv[3], *tensors = argv[4],
             *args = argv[5], *nospec = argv[6], *loose = argv[7], *grid = argv[8], *runtime = argv[9];
    if (!PyDict_Check(plans)) {
        PyErr_SetString(PyExc_TypeError, "launch(): plans must be a dict");
        return NULL;
    }
    if (!signature_args_ok(argv + 1, "launch")) return NULL;
    int no_storage = 0;
    PyObject *sig = signature(head, key, options, tensors, args, nospec, loose, &no_storage);
    if (sig == NULL) {
        if (no_storage) return Py_BuildValue("(OO)", Py_False, Py_None);
        return NULL;
    }
    PyObject *plan = PyDict_GetItemWithError(plans, sig); /* borrowed */
    if (plan == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(sig);
            return NULL;
        }
        return Py_BuildValue("(ON)", Py_False, sig);
    }
    int truthy = PyObject_IsTrue(plan);
    if (truthy <= 0) {
        if (truthy < 0) {
            Py_DECREF(sig);
            return NULL;
        }
        return Py_BuildValue("(ON)", Py_False, sig);
    }
    Py_INCREF(plan);
    Py_DECREF(sig);
    PyObject *kernel = call_plan(plan, args, grid, runtime);
    Py_DECREF(plan);
    if (kernel == NULL) return NULL;
    return Py_BuildValue("(ON)", Py_True, kernel);
}

PyDoc_STRVAR(signature_doc, "signature(head, key, options, tensors, args, nospec, loose) -> tuple or None\n\n"
                            "The signature launch() builds (for the tests, which compare it with Python's).");

static PyObject *signature_py(PyObject *self, PyObject *const *argv, Py_ssize_t argc) {
    (void)self;
    if (argc != 7) {
        PyErr_SetString(PyExc_TypeError, "signature() takes 7 arguments");
        return NULL;
    }
    if (!signature_args_ok(argv, "signature")) return NULL;
    int no_storage = 0;
    PyObject *sig = signature(argv[0], argv[1], argv[2], argv[3], argv[4], argv[5], argv[6], &no_storage);
    if (sig == NULL && no_storage) Py_RETURN_NONE;
    return sig;
}

static PyMethodDef methods[] = {
    {"launch", (PyCFunction)(void (*)(void))launch, METH_FASTCALL, launch_doc},
    {"signature", (PyCFunction)(void (*)(void))signature_py, METH_FASTCALL, signature_doc},
    {NULL, NULL, 0, NULL},
};

/* What launch() takes and returns: _prebound._accelerated() uses a built module only when this is
 * the number it expects (an editable install keeps an old .so until it is rebuilt). */
#define API_VERSION 1

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastlora._prebound_c",
                                    "The hit path of fastlora.ops._prebound.launch_keyed, in C.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__prebound_c(void) {
#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL;
    INTERN(str_data_ptr, "data_ptr")
    INTERN(str_dtype, "dtype")
    INTERN(str_meta, "meta")
    INTERN(str_tail, "tail")
    INTERN(str_get_stream, "get_stream")
    INTERN(str_device_index, "device_index")
    INTERN(str_kernel, "kernel")
    INTERN(str_launcher, "launcher")
    INTERN(str_function, "function")
    INTERN(str_packed, "packed")
    INTERN(str_launch_metadata, "launch_metadata")
    INTERN(str_enter, "launch_enter_hook")
    INTERN(str_exit, "launch_exit_hook")
    INTERN(str_calls, "calls")
#undef INTERN
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
