#!/usr/bin/env python3
"""Plants known classes of protocol bug in the consensus core, one at a time,
and runs the simulator on each to show that it catches it.

    scripts/planted-bugs.py                 # every bug, 500 seeds each
    scripts/planted-bugs.py --seeds 2000    # more seeds
    scripts/planted-bugs.py own-older-ballot reads-no-quorum   # some bugs

Each bug is a small text edit of one file under src/paxos/ (or of the driver or
the forwarding link, which the simulator runs too). The edit is made
in place, the simulator is run (`cargo test --test simulation
simulated_clusters`, the same test CI runs), and the file is restored from git
whatever happens. The script refuses to run while src/paxos/ has uncommitted
changes, so it never mixes a bug with your work. It prints, per bug, how many
seeds failed and the first failure, and exits 1 if any bug was caught by no
seed (or no longer applies: the code moved, so the bug must be re-planted).

This is not part of CI (it rebuilds the simulator once per bug: about 15
minutes for all of them on 2 cores). Run it after changing the core or the
simulator's oracles.
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each: name, what it breaks, file, exact text, its replacement, and the
# simulator test that must catch it (default: the many-seed run).
E = "src/paxos/replica/election.rs"
L = "src/paxos/replica/leader.rs"
F = "src/paxos/replica/learner.rs"
R = "src/paxos/replica/reads.rs"
D = "src/driver.rs"
BUGS = [
    dict(name="own-older-ballot", file=L,
         what="the leader counts an Accepted earned by its own older ballot",
         old="        if self.ballot != ballot {\n            return;\n        }\n        if let Some(p) = self.progress.get_mut(&from) {",
         new="        if self.ballot.node != ballot.node {\n            return;\n        }\n        if let Some(p) = self.progress.get_mut(&from) {"),
    dict(name="any-ballot", file=L,
         what="the leader counts an Accepted of any ballot",
         old="        if self.ballot != ballot {\n            return;\n        }\n        if let Some(p) = self.progress.get_mut(&from) {",
         new="        if let Some(p) = self.progress.get_mut(&from) {"),
    dict(name="promise-before-disk", file=E,
         what="an acceptor sends its Promise before the promise is on disk",
         old="\n        self.send_after_persist(to, msg);\n    }",
         new="\n        self.send(to, msg);\n    }"),
    dict(name="leader-own-vote-early", file=L,
         what="the leader counts its own vote before it is on disk",
         old="core.send_after_persist(core.cfg.id, Message::Accepted { ballot, slot });",
         new="core.send(core.cfg.id, Message::Accepted { ballot, slot });"),
    dict(name="reads-no-quorum", file=R,
         what="reads are served without the quorum confirmation",
         old="if read.round > self.read_round || !confirmed {",
         new="if read.round > self.read_round {"),
    dict(name="follower-accepted-early", file=F,
         what="a follower sends Accepted before its vote is on disk",
         old="core.send_after_persist(from, Message::Accepted { ballot, slot });",
         new="core.send(from, Message::Accepted { ballot, slot });"),
    dict(name="follower-any-ballot", file=F,
         what="a follower commits a vote from any ballot",
         old="Some((b, value)) if b == ballot => {",
         new="Some((_b, value)) => {"),
    dict(name="reads-before-recovery", file=R,
         what="reads are served before the new leader's recovery is chosen",
         old="core.committed >= self.recovered_through\n",
         new="true || core.committed >= self.recovered_through\n"),
    dict(name="no-prevote", file=E, test="a_flaky_follower",
         what="a replica campaigns without PreVote",
         old="let majority = grants.is_majority(&core.cfg.members);",
         new="let majority = true || grants.is_majority(&core.cfg.members);"),
    dict(name="handoff-no-phase-1", file=E,
         what="a follower told TimeoutNow leads at once, without the promises of phase 1",
         old="        self.start_election(Some(ballot));\n    }",
         new="        self.start_election(Some(ballot));\n        self.become_leader();\n    }"),
    dict(name="handoff-sticky", file=E, test="a_hand_off_elects",
         what="acceptors ignore a handed-off prepare while they hear the leader (stickiness)",
         old="            && !handed_off\n",
         new="            && (!handed_off || true)\n"),
    dict(name="driver-wrong-waiter", file=D,
         what="the driver hands a reply to the next proposal's caller",
         old="            self.answer_write(proposal_id, Ok(reply));",
         new="            self.answer_write(proposal_id.wrapping_add(1), Ok(reply));"),
    dict(name="driver-read-early", file=D,
         what="the driver serves a read one slot before its index is applied",
         old="if *entry.key() > self.applied {",
         new="if *entry.key() > self.applied + 1 {"),
    dict(name="driver-forgets-doubtful", file=D,
         what="the driver never answers the writes a deposed leader had given slots",
         old="            w.doubt.get_or_insert(doubt);",
         new="            let _ = (&w, doubt);"),
    dict(name="withdraw-leaves-queued", file="src/paxos/replica/mod.rs",
         what="a withdrawn command is reported taken back but stays queued for a slot",
         old="                taken.push(command.clone());\n            }\n            !take",
         new="                taken.push(command.clone());\n            }\n            true"),
    dict(name="driver-expires-slotted", file=D,
         what="the driver answers a write Expired when its deadline passes, slot or not",
         old="        for id in self.withdraw(&late) {",
         new="        let _ = self.withdraw(&late);\n        for id in late {"),
    dict(name="link-lost-as-unsent", file="src/forwarding.rs",
         what="a broken forwarding link reports its sent calls as never sent (NOT_PROPOSED)",
         old="                let how = if call.sent {",
         new="                let how = if call.sent && false {"),
]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, **kw)


def plant(bug):
    path = os.path.join(ROOT, bug["file"])
    with open(path) as f:
        text = f.read()
    count = text.count(bug["old"])
    if count != 1:
        return f"the text to replace occurs {count} times in {bug['file']}"
    with open(path, "w") as f:
        f.write(text.replace(bug["old"], bug["new"]))
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2000)
    parser.add_argument("bugs", nargs="*", help="names of bugs to plant (default: all)")
    args = parser.parse_args()
    names = {b["name"] for b in BUGS}
    unknown = [n for n in args.bugs if n not in names]
    if unknown:
        sys.exit(f"unknown bug(s) {unknown}; known: {sorted(names)}")
    if run(["git", "diff", "--quiet", "--", "src/paxos", "src/driver.rs", "src/forwarding.rs"]).returncode != 0:
        sys.exit("src/paxos/, src/driver.rs or src/forwarding.rs has uncommitted changes; commit or stash them first")

    env = dict(os.environ, PAXOSKV_SIM_SEEDS=str(args.seeds))
    results = []
    for bug in BUGS:
        if args.bugs and bug["name"] not in args.bugs:
            continue
        print(f"== {bug['name']}: {bug['what']}", flush=True)
        try:
            problem = plant(bug)
            if problem:
                results.append((bug["name"], None, f"NOT PLANTED: {problem}"))
                continue
            test = bug.get("test", "simulated_clusters")
            out = run(["cargo", "test", "--test", "simulation", test], env=env)
            text = out.stdout + out.stderr
            m = re.search(r"^(\d+) of (\d+) seeds failed", text, re.M)
            first = re.search(r"^(seed \d+.*failed.*|seed \d+, .*)$", text, re.M)
            note = first.group(0)[:200] if first else ""
            if m:
                results.append((bug["name"], f"{m.group(1)} of {m.group(2)}", note))
            elif out.returncode == 0:
                results.append((bug["name"], "0", "every seed passed"))
            elif "test result: FAILED" in text:
                results.append((bug["name"], "failed", f"{test}: {note}"))
            else:
                tail = "\n".join(text.strip().splitlines()[-5:])
                results.append((bug["name"], None, f"build or run failed:\n{tail}"))
        finally:
            run(["git", "checkout", "--", bug["file"]])
        print(f"   caught: {results[-1][1]}", flush=True)

    print()
    print(f"{'planted bug':<26} {'caught by':<12} first failure")
    missed = False
    for name, caught, note in results:
        print(f"{name:<26} {caught or '-':<12} {note}")
        missed |= caught in (None, "0")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
