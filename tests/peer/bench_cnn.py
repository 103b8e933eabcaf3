"""TensorFlow 1.x-style peer of tests/examples/bench_cnn.rs: one training step of a small CNN on
28x28x1 images, batch 64 (conv 5x5x32 SAME + ReLU + maxpool 2x2, conv 5x5x64 SAME + ReLU +
maxpool 2x2, dense 3136->256 ReLU, dense 256->10, sparse softmax cross-entropy,
GradientDescent(0.01)); inter_op 2, intra_op 2. Prints RESULT cnn_train_step[batch=64].

  python3 bench_cnn.py [INTRA]
"""
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

v1 = tf.compat.v1
v1.disable_eager_execution()
BATCH = 64
STEPS = 10
REPS = 7


def layer(name, shape, out, seed):
    w = v1.Variable(v1.truncated_normal(shape, stddev=0.1, seed=seed), name=f"{name}_w")
    b = v1.Variable(tf.zeros([out]), name=f"{name}_b")
    return w, b


def main():
    intra = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rs = np.random.RandomState(1)
    images = tf.constant(rs.uniform(-1, 1, (BATCH, 28, 28, 1)).astype(np.float32))
    labels = tf.constant(np.arange(BATCH, dtype=np.int32) % 10)
    w1, b1 = layer("conv1", [5, 5, 1, 32], 32, 1)
    h1 = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(images, w1, [1, 1, 1, 1], "SAME"), b1))
    p1 = tf.nn.max_pool2d(h1, 2, 2, "SAME")
    w2, b2 = layer("conv2", [5, 5, 32, 64], 64, 2)
    h2 = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(p1, w2, [1, 1, 1, 1], "SAME"), b2))
    p2 = tf.nn.max_pool2d(h2, 2, 2, "SAME")
    flat = tf.reshape(p2, [BATCH, 7 * 7 * 64])
    w3, b3 = layer("fc1", [7 * 7 * 64, 256], 256, 3)
    h3 = tf.nn.relu(tf.nn.bias_add(tf.matmul(flat, w3), b3))
    w4, b4 = layer("fc2", [256, 10], 10, 4)
    logits = tf.nn.bias_add(tf.matmul(h3, w4), b4)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    train = v1.train.GradientDescentOptimizer(0.01).minimize(loss)
    cfg = v1.ConfigProto(inter_op_parallelism_threads=2, intra_op_parallelism_threads=intra)
    with v1.Session(config=cfg) as s:
        s.run(v1.global_variables_initializer())
        first = s.run(loss)
        for _ in range(3):
            s.run(train)
        times = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            for _ in range(STEPS):
                s.run(train)
            times.append((time.perf_counter() - t0) / STEPS)
        last = s.run(loss)
    m = statistics.median(times)
    print(f"RESULT cnn_train_step[batch={BATCH}] = {1 / m:.1f} steps/s "
          f"({m * 1e3:.1f} ms/step, intra={intra}, loss {first:.3f} -> {last:.3f})", flush=True)


if __name__ == "__main__":
    main()
