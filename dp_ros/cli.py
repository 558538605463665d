"""`dp-ros` command line: demo, train, dataset, record-demos, play, bench, soak, up.

Each subcommand is a thin wrapper over a library function, so everything a command does can
also be done from Python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(episodes=args.episodes, policy=args.policy, fresh=args.fresh,
                    demos=args.demos, baseline=args.baseline, speed=args.speed,
                    minutes=args.minutes, out=args.out,
                    warm_start_steps=args.warm_start_steps,
                    warm_start_keep_steps=args.warm_start_keep_steps)


def cmd_train(args: argparse.Namespace) -> int:
    from .paths import config_file
    from .policy.train import load_train_config, train
    policy_cfg, train_cfg = load_train_config(config_file(args.config))
    if args.steps is not None:
        train_cfg.num_steps = args.steps
    if args.minutes is not None:
        train_cfg.max_minutes = args.minutes
    if args.device is not None:
        train_cfg.device = args.device
    final = train(args.data, (policy_cfg, train_cfg), args.out, resume=not args.no_resume)
    print(f"checkpoint: {final}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from .data.synthetic import make_synthetic_store
    if args.bags:
        if args.synthetic is not None:
            print("dp-ros dataset: give bags or --synthetic N, not both", file=sys.stderr)
            return 2
        if not args.config:
            print("dp-ros dataset: bags need --config FILE (the node parameter file)",
                  file=sys.stderr)
            return 2
        from .data.from_bags import main as dataset_from_bags
        from .paths import config_file
        args.config = str(config_file(args.config))
        return dataset_from_bags(args)
    if args.synthetic is None:
        print("dp-ros dataset: give bags (dp-ros dataset BAG... --config FILE --out STORE) "
              "or --synthetic N", file=sys.stderr)
        return 2
    store = make_synthetic_store(args.out, episodes=args.synthetic, seed=args.seed,
                                 overwrite=args.overwrite)
    print(f"{args.out}: {store.n_episodes} episodes, {store.n_steps} steps")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "policy":
        from .bench.policy import run
        which = ("cnn", "transformer") if args.config == "both" else (args.config,)
        return run(iterations=args.iterations, device=args.device, which=which,
                   backends=tuple(args.backend or ["torch"]), precisions=tuple(args.precision),
                   warm_start_steps=tuple(args.warm_start_steps), compare=args.compare,
                   lerobot_venv=args.lerobot_venv, threads=args.threads)
    if args.what == "ros":
        from .bench.ros import run as run_ros
        if args.backend and len(args.backend) > 1:
            print("dp-ros bench ros: give one --backend (the policy node's)", file=sys.stderr)
            return 2
        return run_ros(seconds=args.seconds, device=args.device,
                       realtime_priority=args.realtime_priority,
                       backend=(args.backend or ["onnxruntime"])[0], with_floor=args.floor)
    print(f"dp-ros bench: unknown benchmark {args.what!r}", file=sys.stderr)
    return 2


def cmd_record_demos(args: argparse.Namespace) -> int:
    from .record_demos import main as record_main
    return record_main(args)


def cmd_eval_bag(args: argparse.Namespace) -> int:
    from .evaluate_bag import main as eval_main
    return eval_main(args)


def cmd_play(args: argparse.Namespace) -> int:
    from .nodes.bag_player import main_cli as play_main
    return play_main(args)


def cmd_import(args: argparse.Namespace) -> int:
    from .policy.importers import ImportRefused, import_diffusion_policy, import_lerobot
    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        print(f"dp-ros import: {out} already holds a checkpoint (pass --overwrite to replace it)",
              file=sys.stderr)
        return 2
    common = dict(dt=args.dt, state_names=args.state_names, action_names=args.action_names)
    try:
        if args.source == "lerobot":
            if args.trust_pickle:
                print("dp-ros import: note: --trust-pickle is not needed for LeRobot (safetensors)",
                      file=sys.stderr)
            result = import_lerobot(args.src, out, **common)
        else:
            result = import_diffusion_policy(args.src, out, trust_pickle=args.trust_pickle,
                                             use_ema=not args.no_ema, **common)
    except ImportRefused as exc:
        print(f"dp-ros import: refused: {exc}", file=sys.stderr)
        return 2
    cfg = result.config
    cams = ", ".join(f"{c.name} {c.height}x{c.width}" for c in cfg.cameras) or "none"
    s = cfg.schedule
    print(f"imported {result.source} -> {result.out}")
    print(f"  cameras: {cams}; state {cfg.state_dim}, action {cfg.action_dim}; "
          f"T_o {cfg.T_o}, T_p {cfg.T_p}, T_a {cfg.T_a}, dt {cfg.dt:g} s")
    print(f"  {cfg.denoiser}, {s.sampler.upper()} x {s.num_inference_steps} "
          f"({s.prediction_type}, {s.beta_schedule})")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .policy import CheckpointError, load_policy
    from .policy.export import export_policy
    try:
        policy = load_policy(args.ckpt, device="cpu", seed=0)
    except CheckpointError as exc:
        print(f"dp-ros export: {exc}", file=sys.stderr)
        return 2
    try:
        manifest = export_policy(policy, args.onnx, int8=args.int8,
                                 torch_precisions=tuple(args.check_precision or ()))
    except (ValueError, RuntimeError) as exc:
        print(f"dp-ros export: {exc}", file=sys.stderr)
        return 2
    eq = manifest["equality"]
    return 0 if max(eq["max_abs"].values()) <= eq["tolerance"] else 1


def cmd_soak(args: argparse.Namespace) -> int:
    from .soak import run
    return run(minutes=args.minutes, warmup=args.warmup, policy=args.policy, out=args.out,
               progress=not args.quiet, domain_id=args.domain_id)


def cmd_up(args: argparse.Namespace) -> int:
    from .bringup import up
    return up(args.config, policy=args.policy, use_sim_time=args.use_sim_time,
              single_process=args.single_process, only=args.only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dp-ros", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="record expert demos on the simulated arm, train a small "
                       "policy on the CPU, run it closed loop through the ROS nodes")
    p.add_argument("--episodes", type=int, default=20,
                   help="closed-loop evaluation episodes (default 20)")
    p.add_argument("--policy", metavar="CKPT",
                   help="evaluate this checkpoint instead of the demo's own")
    p.add_argument("--fresh", action="store_true",
                   help="re-record the demonstrations and retrain (cached otherwise)")
    p.add_argument("--demos", type=int, default=100,
                   help="expert demonstrations to record (default 100)")
    p.add_argument("--baseline", action="store_true",
                   help="also train and evaluate the MSE regression head on the same data")
    p.add_argument("--speed", type=float, default=2.0,
                   help="simulated time at most this many times faster than real time "
                        "(slows down to real time when inference cannot keep up)")
    p.add_argument("--minutes", type=float, help="training time budget (default: the "
                   "config's)")
    p.add_argument("--warm-start-steps", nargs="+", type=int, default=[], metavar="N",
                   help="also evaluate the diffusion policy with the policy node's "
                   "warm_start_steps N (compare latency, switch jumps and success with cold)")
    p.add_argument("--warm-start-keep-steps", type=int, default=0, metavar="N",
                   help="the policy node's warm_start_keep_steps for those warm-start runs: "
                   "keep the running plan up to N - 1 steps after a new plan's stamp "
                   "(default 0)")
    p.add_argument("--out", help="folder for the paths PNG and the episode GIF "
                   "(default: the cache folder)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a policy on an episode store")
    p.add_argument("--data", required=True, help="episode store (zarr)")
    p.add_argument("--config", required=True, help="training YAML (policy: + train:)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, resume state)")
    p.add_argument("--steps", type=int, help="override train.num_steps")
    p.add_argument("--minutes", type=float, help="override train.max_minutes")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--no-resume", action="store_true", help="start over even if resume state exists")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("dataset", help="build an episode store from bags (or a synthetic one)",
                       description="Build an episode store from rosbag2 bags with the "
                       "aggregator's observation code, reading its settings from the node "
                       "parameter file (obs_aggregator section; actions and episodes from a "
                       "'dataset' section or the flags below), or generate a synthetic one.")
    p.add_argument("bags", nargs="*", metavar="BAG", help="rosbag2 bags (MCAP or sqlite3)")
    p.add_argument("--config", help="node parameter file (a path, or a name in config/)")
    p.add_argument("--action-topic", help="actions: sensor_msgs/JointState or "
                   "std_msgs/Float64MultiArray (default /expert/action)")
    p.add_argument("--action-joints", nargs="+", metavar="JOINT",
                   help="action joint names, in order (default: policy_node joint_names)")
    p.add_argument("--episode-topic", help="std_msgs/String JSON episode boundaries "
                   "(default /episode; a bag without it is one episode)")
    p.add_argument("--remap", nargs="+", metavar="FROM:=TO", default=[],
                   help="rename recorded topics")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--synthetic", type=int, metavar="N", help="generate N point-mass episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("record-demos", help="record expert demonstrations on the simulated "
                       "arm into a rosbag2 bag")
    p.add_argument("--episodes", type=int, default=50, help="episodes to record")
    p.add_argument("--out", required=True, type=Path, help="bag directory to create")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    p.add_argument("--seed", type=int, default=0, help="episode and expert seed")
    p.add_argument("--config", help="parameter file whose sim_arm section sets up the arm "
                   "(default config/demo_robot.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bag")
    p.add_argument("--visible", action="store_true",
                   help="let other ROS processes see the recording's topics (default: hidden)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_record_demos)

    p = sub.add_parser("eval-bag", help="evaluate a policy offline on recorded bags "
                       "(windows rebuilt with the aggregator's code, plans vs recorded actions)")
    p.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 bags (MCAP or sqlite3)")
    p.add_argument("--policy", required=True, help="checkpoint directory")
    p.add_argument("--config", default="demo_robot.yaml",
                   help="parameter file with the obs_aggregator (and optional dataset) "
                        "sections (default: config/demo_robot.yaml)")
    p.add_argument("--topics", nargs="+", metavar="FROM:=TO", default=[],
                   help="rename recorded topics to the configured names")
    p.add_argument("--start", type=float, metavar="S", help="from S seconds into the bag")
    p.add_argument("--end", type=float, metavar="S", help="to S seconds into the bag")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed (>= 0): plans equal policy_node's with the same seed")
    p.add_argument("--replan-every", type=int, metavar="N",
                   help="plan every N ticks (default: the checkpoint's T_a)")
    p.add_argument("--action-topic", help="recorded actions (default: the config's dataset "
                   "section, else /expert/action)")
    p.add_argument("--episode-topic", help="episode boundaries (default /episode)")
    p.add_argument("--device", default="cpu", help="inference device (default cpu)")
    p.add_argument("--out", type=Path, default=Path("eval-bag"),
                   help="directory for eval.json and the PNG plots (default ./eval-bag)")
    p.add_argument("--no-output", action="store_true", help="terminal table only")
    p.add_argument("--no-plots", action="store_true", help="JSON but no PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_bag)

    p = sub.add_parser("play", help="publish a bag's messages on live topics (and /clock)")
    p.add_argument("bag", help="rosbag2 bag (MCAP or sqlite3)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    p.add_argument("--clock", nargs="?", type=float, const=100.0, default=None, metavar="HZ",
                   help="publish /clock from bag time (default 100 Hz) for use_sim_time")
    p.add_argument("--loop", action="store_true", help="start over at the end")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="play only these topics")
    p.add_argument("--remap", nargs="+", metavar="FROM:=TO", default=[],
                   help="publish recorded topic FROM as TO")
    p.add_argument("--start-offset", type=float, default=0.0, metavar="S",
                   help="skip the first S seconds of the bag")
    p.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for every topic to have a subscriber")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    p.add_argument("what", choices=["policy", "ros"])
    p.add_argument("--config", choices=["cnn", "transformer", "both"], default="both")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=30.0, help="ros: measurement time")
    p.add_argument("--backend", nargs="+", choices=["torch", "onnxruntime"],
                   help="policy: inference backends to time (default torch); ros: the policy "
                   "node's backend (default onnxruntime, the faster one on a CPU)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16", "int8"],
                   default=["fp32"], help="policy: precisions to time where the backend offers "
                   "them (bf16/fp16: torch, int8: onnxruntime), with their accuracy vs fp32")
    p.add_argument("--warm-start-steps", nargs="+", type=int, default=[], metavar="N",
                   help="policy: also time warm-started plans with N denoising steps")
    p.add_argument("--compare", choices=["lerobot"],
                   help="policy: run LeRobot 0.4.4's DiffusionPolicy on the same weights and "
                   "noise (subprocess in its own venv), check equal actions, time alternately")
    p.add_argument("--lerobot-venv", metavar="PATH",
                   help="policy: LeRobot's virtual environment (created there when missing; "
                   "default under the dp_ros cache folder)")
    p.add_argument("--threads", type=int, help="policy: torch/onnxruntime threads "
                   "(default: torch's)")
    p.add_argument("--realtime-priority", type=int, default=0, metavar="N",
                   help="ros: run the executor under SCHED_FIFO priority N and the "
                        "aggregator, the policy node and the sensor source 10 below (their "
                        "realtime_priority parameter; needs CAP_SYS_NICE or rtprio)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="ros: do not run the no-work floor beside the pipeline (three light "
                        "processes that pass a stamp along the same hops, and a bare timer, "
                        "to show what rclpy and DDS alone cost on this machine)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("import", help="convert a LeRobot or diffusion_policy checkpoint into a "
                       "dp_ros checkpoint",
                       description="Convert a policy trained with LeRobot (save_pretrained directory) "
                       "or with the paper's reference code (.ckpt) into a dp_ros checkpoint "
                       "directory. Settings dp_ros cannot reproduce are refused by name.")
    p.add_argument("source", choices=["lerobot", "diffusion-policy"])
    p.add_argument("src", help="LeRobot directory (config.json + model.safetensors [+ processor "
                   "files]) or diffusion_policy .ckpt")
    p.add_argument("--out", required=True, help="dp_ros checkpoint directory to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="diffusion-policy: the .ckpt is a pickle; read it (restricted to tensors and "
                   "plain data) only if you trust its origin")
    p.add_argument("--dt", type=float, help="control period in seconds (default: from the "
                   "checkpoint when it records one, else 0.1)")
    p.add_argument("--state-names", nargs="+", metavar="NAME",
                   help="joint names of the state vector, in order (default state_0...)")
    p.add_argument("--action-names", nargs="+", metavar="NAME",
                   help="joint names of the action vector, in order (default action_0...)")
    p.add_argument("--no-ema", action="store_true",
                   help="diffusion-policy: use state_dicts.model even when EMA weights exist")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a checkpoint as ONNX (encoder per camera, denoiser) "
                       "and check it against torch",
                       description="Export a checkpoint for the onnxruntime backend: the encoder "
                       "per camera and the denoiser (one step, and for DDIM the unrolled loop; the "
                       "faster is recorded) with the normaliser folded in. Prints the largest "
                       "action difference from the torch backend on fixed windows (must be <= "
                       "1e-4) and, when asked, the accuracy gate of reduced precisions.")
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--onnx", required=True, metavar="OUT", help="directory to write the ONNX files to")
    p.add_argument("--int8", action="store_true",
                   help="also write int8-quantized denoiser weights and gate them against fp32")
    p.add_argument("--check-precision", nargs="+", choices=["bf16", "fp16"], metavar="P",
                   help="also run the accuracy gate of the torch backend at these precisions")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("soak", help="run the nodes for N minutes (2 cameras 640x480 at 30 Hz, "
                       "joint states at 500 Hz) and check memory, queues, drops and the "
                       "safety contract",
                       description="Runs the sensor source and the three nodes as processes for "
                       "--minutes after --warmup and prints: resident memory per node after "
                       "warm-up and at the end (growth must stay < 5%%), queue sizes (must not "
                       "grow), dropped windows against those inference time makes necessary, and "
                       "safety-contract violations (must be 0). Exit code 1 when a criterion "
                       "fails. Details: the docstring of dp_ros/soak.py.")
    p.add_argument("--minutes", type=float, default=10.0, help="measurement time (after warm-up)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before measuring")
    p.add_argument("--policy", help="checkpoint (default: the cached demo policy, else a "
                   "small generated one)")
    p.add_argument("--out", default="soak", help="directory for soak.json and soak_rss.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--domain-id", type=int, default=None,
                   help="ROS domain for the run (default: one derived from the process id)")
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("up", help="start the nodes (one process each) without ros2 launch")
    p.add_argument("--config", required=True,
                   help="ROS 2 parameter file (a path, or a name in dp_ros's config/)")
    p.add_argument("--policy", help="checkpoint directory: policy_node's policy_path")
    p.add_argument("--use-sim-time", action="store_true", help="every node follows /clock")
    p.add_argument("--single-process", action="store_true",
                   help="all nodes in one process (one executor thread)")
    p.add_argument("--only", nargs="+", metavar="NODE",
                   help="start only these nodes (obs_aggregator policy_node "
                        "trajectory_executor sim_arm)")
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
