"""Independent check of every limitation the zoo's error cells name, with plain TF/Keras + numpy.

    python tests/verify_zoo_limitations.py all     # prints one line per check; REAL = still a limitation;
                                                   # REGISTRATION = reloads bit-identically once its classes are
                                                   # registered (custom_objects): not a limitation; ORDER = reloads
                                                   # only once the package its config names is imported

Stage 'save' (one process) builds and trains models with the zoo modules' own
build functions and saves them with plain Keras calls; every 'load' check runs
in a FRESH process and reloads with plain keras / tf.saved_model.load. No
harness save/load/predict/compare code is used. When a line stops saying REAL
after a Keras/TensorFlow upgrade, the matching entry of
harness.formats.LIMITATIONS (and the zoo test's expectation) can go.
Output directory: $ZOO_VERIFY_OUT (default /tmp/zoo-verify).
"""
import importlib.util, json, os, subprocess, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
ROOT = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
OUT = os.environ.get("ZOO_VERIFY_OUT", "/tmp/zoo-verify")
sys.path.insert(0, ROOT)  # only so scenario modules can `from harness import Scenario`


def mod(name):
    spec = importlib.util.spec_from_file_location(f"zoo_{name}", f"{ROOT}/scenarios/zoo/{name}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def scen(module, name):
    return next(s for s in mod(module).SCENARIOS if s.name == name)


def fit(s):
    import keras, numpy as np
    keras.utils.set_random_seed(s.seed)
    m = s.build()
    m.compile(**s.compile)
    d = s.data(np.random.default_rng([s.seed, 0]))
    (m.fit(**d, verbose=0, **s.fit) if isinstance(d, dict) else m.fit(*d, verbose=0, **s.fit))
    return m, s.probe(np.random.default_rng([s.seed, 1]))


def in_memory(m, probe, name):
    """The in-memory model's outputs as one tf.function (how the harness takes its first reference)."""
    import numpy as np, tensorflow as tf
    out = tf.function(lambda x: m(x, training=False))(probe)
    np.save(f"{OUT}/{name}.inmemory.npy", {k: np.asarray(v) for k, v in enumerate(tf.nest.flatten(out))},
            allow_pickle=True)


def same_as_in_memory(m, name):
    import numpy as np, tensorflow as tf
    probe = np.load(f"{OUT}/{name}.probe.npy", allow_pickle=True)
    probe = probe.item() if probe.dtype == object else probe
    ref = np.load(f"{OUT}/{name}.inmemory.npy", allow_pickle=True).item()
    out = tf.nest.flatten(tf.function(lambda x: m(x, training=False))(probe))
    return all(np.asarray(o).dtype == ref[k].dtype and np.array_equal(np.asarray(o), ref[k]) for k, o in enumerate(out))


def save_stage():
    import keras, numpy as np, tensorflow as tf
    os.makedirs(OUT, exist_ok=True)
    # 1. legacy h5 of four functional models
    for module, name in [("vision", "zoo-mobilenetv3-small"), ("sequence", "zoo-transformer-encoder"),
                         ("preprocessing", "zoo-numeric-preprocessing"), ("misc", "zoo-multi-output-dtypes"),
                         ("preprocessing", "zoo-string-lookup")]:
        keras.backend.clear_session()
        m, probe = fit(scen(module, name))
        m.save(f"{OUT}/{name}.h5")
        if name == "zoo-string-lookup":
            m.save(f"{OUT}/{name}.keras")
        np.save(f"{OUT}/{name}.probe.npy", probe, allow_pickle=True)
        if name != "zoo-string-lookup":
            in_memory(m, probe, name)
        keras.config.set_dtype_policy("float32")
    # 1c. unregistered classes: keras.applications ConvNeXt's LayerScale/StochasticDepth, keras_hub models
    for module, name in [("vision", "zoo-convnext-mini"), ("hub", "zoo-keras-hub-resnet"),
                         ("hub", "zoo-keras-hub-bert")]:
        keras.backend.clear_session()
        m, probe = fit(scen(module, name))
        m.save(f"{OUT}/{name}.h5")
        m.save(f"{OUT}/{name}.keras")
        np.save(f"{OUT}/{name}.probe.npy", probe, allow_pickle=True)
        in_memory(m, probe, name)
        if name == "zoo-keras-hub-bert":
            m.export(f"{OUT}/bert_export", verbose=False)
            np.save(f"{OUT}/bert.eager.npy", m(probe, training=False).numpy())
    # 1b. an adapted StringLookup alone (no keras.ops node) in legacy h5
    keras.backend.clear_session()
    words = keras.Input((3,), dtype="string")
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["red", "green", "blue"], dtype=object))
    keras.Model(words, keras.layers.Dense(2)(keras.layers.CategoryEncoding(lookup.vocabulary_size(),
                                                                          output_mode="multi_hot")(lookup(words)))
                ).save(f"{OUT}/adapted_lookup.h5")
    # 2. tf.Module in Keras formats
    s = scen("misc", "zoo-tf-module")
    module = s.train(s.seed)
    res = {}
    for what, call in [("model.save", lambda: module.save(f"{OUT}/m.keras")),
                       ("keras.saving.save_model", lambda: keras.saving.save_model(module, f"{OUT}/m.keras")),
                       ("model.export", lambda: module.export(f"{OUT}/m_export")),
                       ("model.save_weights", lambda: module.save_weights(f"{OUT}/m.weights.h5"))]:
        try:
            call(); res[what] = "ok"
        except Exception as e:
            res[what] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    json.dump(res, open(f"{OUT}/tf_module.json", "w"))
    # 3. augmentation model exported with model.export
    keras.backend.clear_session()
    m, probe = fit(scen("misc", "zoo-noise-augmentation"))
    m.export(f"{OUT}/aug_export", verbose=False)
    np.save(f"{OUT}/aug.probe.npy", probe)
    np.save(f"{OUT}/aug.inference.npy", m.predict(probe, verbose=0))
    # 4. transformer: exported graph vs in-memory graph
    keras.backend.clear_session()
    m, probe = fit(scen("sequence", "zoo-transformer-encoder"))
    m.export(f"{OUT}/tr_export", verbose=False)
    np.save(f"{OUT}/tr.probe.npy", probe)
    np.save(f"{OUT}/tr.inmemory.npy", tf.function(lambda x: m(x, training=False))(tf.constant(probe)).numpy())
    # 5. the policy leak the harness had: numeric preprocessing built while mixed_bfloat16 is global
    for policy in ("float32", "mixed_bfloat16"):
        keras.backend.clear_session()
        keras.config.set_dtype_policy(policy)
        m, probe = fit(scen("preprocessing", "zoo-numeric-preprocessing"))
        keras.config.set_dtype_policy("float32")
        m.save(f"{OUT}/num_{policy}.keras")
        np.save(f"{OUT}/num_{policy}.probe.npy", probe)
        mem = tf.function(lambda x: m(x, training=False))(tf.constant(probe)).numpy()
        json.dump({"dtype": mem.dtype.name, "layer_policy": m.layers[-1].dtype_policy.name}, open(f"{OUT}/num_{policy}.json", "w"))
        np.save(f"{OUT}/num_{policy}.inmemory.npy", mem.astype(np.float32))  # exact: bfloat16 c float32
    # 6. RNG state tracked by model.export; auto-named layers in a busy process
    keras.backend.clear_session()
    for _ in range(2):
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])  # the process built models before
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16), keras.layers.Dropout(0.2), keras.layers.Dense(2)])
    m.export(f"{OUT}/drop_export", verbose=False)
    m.save_weights(f"{OUT}/drop.weights.h5")
    json.dump({"weights": [v.path for v in m.weights], "variables": [v.path for v in m.variables],
               "values": {v.path: np.asarray(v).tolist() for v in m.weights}}, open(f"{OUT}/drop.json", "w"))


LOADS = {}


def load(fn):
    LOADS[fn.__name__] = fn
    return fn


#: h5 files that name classes nothing registers under those names: (module, class) to register.
NEEDS_REGISTRATION = {
    "zoo-numeric-preprocessing": [("keras.src.ops.numpy", "GetItem")],
    "zoo-multi-output-dtypes": [("keras.src.ops.numpy", "Argmax"), ("keras.src.ops.core", "Cast")],
    "zoo-keras-hub-resnet": [("keras_hub.src.models.resnet.resnet_image_classifier", "ResNetImageClassifier")],
    "zoo-convnext-mini": [("keras.src.applications.convnext", "LayerScale"),
                          ("keras.src.applications.convnext", "StochasticDepth")],
}


@load
def h5_registration():
    """Plain keras.models.load_model of the h5 fails on an unknown class; with the classes registered it either
    reloads with the in-memory model's bits (REGISTRATION: not a limitation) or fails for real (REAL)."""
    import importlib, keras
    for name, classes in NEEDS_REGISTRATION.items():
        try:
            keras.models.load_model(f"{OUT}/{name}.h5", compile=False)
            print(f"{name}/h5: plain reload OK (NOT reproduced)")
            continue
        except Exception as e:
            plain = " ".join(str(e).split())[:80]
        custom = {c: getattr(importlib.import_module(m), c) for m, c in classes}
        try:
            m = keras.models.load_model(f"{OUT}/{name}.h5", compile=False, custom_objects=custom)
            same = same_as_in_memory(m, name)
            print(f"{name}/h5: {'REGISTRATION' if same else 'DIFFERS'} -- plain: {plain}; with custom_objects "
                  f"{sorted(custom)}: reloads, outputs {'bit-identical to' if same else 'DIFFERENT from'} the in-memory model")
        except Exception as e:
            print(f"{name}/h5: REAL -- plain: {plain}; with {sorted(custom)} registered: {type(e).__name__}: "
                  f"{' '.join(str(e).split())[:150]}")


@load
def h5_package_import():
    """A keras_hub backbone inside a functional model is saved in h5 as 'keras_hub>BertBackbone': plain Keras
    finds it only once keras_hub is imported (which loading any .keras file naming keras_hub does)."""
    import keras, sys
    name = "zoo-keras-hub-bert"
    try:
        keras.models.load_model(f"{OUT}/{name}.h5", compile=False)
        first = "OK"
    except Exception as e:
        first = " ".join(str(e).split())[:70]
    assert "keras_hub" not in sys.modules
    keras.models.load_model(f"{OUT}/{name}.keras", compile=False)  # imports keras_hub, as Keras's rule allows
    m = keras.models.load_model(f"{OUT}/{name}.h5", compile=False)
    print(f"{name}/h5: ORDER -- first in a process: {first}; after a .keras load (keras_hub imported): "
          f"{'bit-identical' if same_as_in_memory(m, name) else 'DIFFERENT'}")


@load
def bert_export():
    import numpy as np, tensorflow as tf
    name = "zoo-keras-hub-bert"
    probe = np.load(f"{OUT}/{name}.probe.npy", allow_pickle=True).item()
    ref = np.load(f"{OUT}/{name}.inmemory.npy", allow_pickle=True).item()[0]
    eager = np.load(f"{OUT}/bert.eager.npy")
    obj = tf.saved_model.load(f"{OUT}/bert_export")  # kept referenced: its variables die with it
    served = obj.serve(probe).numpy()
    ulp = lambda a, b: int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())
    print(f"{name}/savedmodel: export served vs in-memory tf.function: {np.count_nonzero(served != ref)} of "
          f"{ref.size} differ ({ulp(served, ref)} ULP); served vs eager: {np.count_nonzero(served != eager)} differ")


@load
def h5_reload():
    import keras, numpy as np
    for name in ["zoo-mobilenetv3-small", "zoo-transformer-encoder", "zoo-string-lookup"]:
        try:
            m = keras.models.load_model(f"{OUT}/{name}.h5", compile=False)
            probe = np.load(f"{OUT}/{name}.probe.npy", allow_pickle=True).item() if name == "zoo-string-lookup" \
                else np.load(f"{OUT}/{name}.probe.npy")
            if name == "zoo-string-lookup":
                import tensorflow as tf
                probe = {k: tf.constant(v.astype(str)) for k, v in probe.items()}
            m(probe, training=False)
            print(f"{name}/h5: reload + predict OK (NOT reproduced)")
        except Exception as e:
            msg = " ".join(str(e).split())
            print(f"{name}/h5: REAL -- {type(e).__name__}: {msg[:230]}")


@load
def tf_module():
    print("zoo-tf-module/{keras,h5,savedmodel,weights}: REAL --", json.load(open(f"{OUT}/tf_module.json")))


@load
def augmentation_export():
    import numpy as np, tensorflow as tf
    obj = tf.saved_model.load(f"{OUT}/aug_export")
    x = tf.constant(np.load(f"{OUT}/aug.probe.npy"))
    a, b = obj.serve(x).numpy(), obj.serve(x).numpy()
    ref = np.load(f"{OUT}/aug.inference.npy")
    print(f"zoo-noise-augmentation/savedmodel: {'REAL' if not np.array_equal(a, ref) else 'NOT reproduced'} -- "
          f"serve(x) vs model.predict: {np.count_nonzero(a != ref)}/{a.size} differ (max {np.abs(a - ref).max():.3g}); "
          f"two serve(x) calls differ in {np.count_nonzero(a != b)}/{a.size}")


@load
def transformer_export():
    import numpy as np, tensorflow as tf
    obj = tf.saved_model.load(f"{OUT}/tr_export")
    x = tf.constant(np.load(f"{OUT}/tr.probe.npy"))
    ref = np.load(f"{OUT}/tr.inmemory.npy")
    direct = obj.serve(x).numpy()
    wrapped = tf.function(obj.serve)(x).numpy()
    ulp = lambda a: int(np.abs(a.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64)).max())
    print(f"zoo-transformer-encoder/savedmodel: direct obj.serve(x) vs in-memory: "
          f"{np.count_nonzero(direct != ref)} differ ({ulp(direct)} ULP); tf.function(obj.serve)(x): "
          f"{np.count_nonzero(wrapped != ref)} differ ({ulp(wrapped)} ULP) (why the harness calls serve unwrapped)")


@load
def h5_adapted_vocabulary():
    import keras, tensorflow as tf
    m = keras.models.load_model(f"{OUT}/adapted_lookup.h5", compile=False)
    try:
        m(tf.constant([["red", "blue", "zzz"]]))
        print("adapted-lookup/h5: predict OK (NOT reproduced)")
    except Exception as e:
        msg = " ".join(str(e).split())
        print(f"adapted-lookup/h5: REAL -- {type(e).__name__}: "
              f"{'Table not initialized' if 'Table not initialized' in msg else msg[:150]}")


@load
def xla_string_inputs():
    import keras, tensorflow as tf
    m = keras.models.load_model(f"{OUT}/zoo-string-lookup.keras", compile=False)
    x = {"words": tf.constant([["red", "blue", "x"]] * 4), "text": tf.constant([["a bright red sun"]] * 4)}
    f = tf.function(lambda t: m(t, training=False), jit_compile=True)
    for attempt in (1, 2):  # the second attempt aborts this process: the caller reports the exit code
        try:
            f(x)
            print(f"xla-string-inputs/attempt {attempt}: compiled (NOT reproduced)")
        except Exception as e:
            print(f"xla-string-inputs/attempt {attempt}: raised {type(e).__name__}: {str(e).splitlines()[0][:60]}",
                  flush=True)


@load
def policy_leak():
    import keras, numpy as np, tensorflow as tf
    for policy in ("float32", "mixed_bfloat16"):
        m = keras.models.load_model(f"{OUT}/num_{policy}.keras", compile=False)
        x = tf.constant(np.load(f"{OUT}/num_{policy}.probe.npy"))
        out = tf.function(lambda t: m(t, training=False))(x).numpy()
        ref = np.load(f"{OUT}/num_{policy}.inmemory.npy")
        o, r = out.astype(np.float32), ref
        meta = json.load(open(f"{OUT}/num_{policy}.json"))
        print(f"zoo-numeric-preprocessing/keras built under global {policy}: in-memory {meta}, reload {out.dtype}, "
              f"{np.count_nonzero(o != r)} of {out.size} values differ (max abs {np.abs(o - r).max():.3g})")


@load
def rng_state_and_names():
    import keras, numpy as np, tensorflow as tf
    info = json.load(open(f"{OUT}/drop.json"))
    obj = tf.saved_model.load(f"{OUT}/drop_export")
    print("model.weights:", info["weights"])
    print("exported variables:", [v.name for v in obj.variables])
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16), keras.layers.Dropout(0.2), keras.layers.Dense(2)])
    m.load_weights(f"{OUT}/drop.weights.h5")
    same = all(np.array_equal(np.asarray(v), np.asarray(info["values"][p]))
               for v, p in zip(m.weights, info["weights"]))
    print("weights reloaded in a fresh process: names", [v.path for v in m.weights], "values equal by position:", same)


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save_stage()
    elif sys.argv[1] == "all":
        subprocess.run([sys.executable, __file__, "save"], check=True)
        for name in LOADS:
            rc = subprocess.run([sys.executable, __file__, name], check=False).returncode
            if rc:
                print(f"{name}: process exited with {rc}" + (" -- REAL abort" if rc < 0 or rc == 134 else ""),
                      flush=True)
    else:
        LOADS[sys.argv[1]]()
