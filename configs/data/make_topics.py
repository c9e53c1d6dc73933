"""Generate configs/data/topics.jsonl: a small, clearly separable 4-class topic set (run once; output committed).

Each document is 3-4 sentences drawn (seeded) from its class's sentence pool, with class-specific names filled
in, so classes share almost no vocabulary and no two documents are near duplicates."""

import json
import random
from pathlib import Path

POOLS = {
    "sports": ["The {team} won the match after a late goal in extra time.",
               "Their striker scored twice and the coach praised the defense.",
               "Fans filled the stadium to watch the {team} play the league final.",
               "The goalkeeper saved a penalty in the second half.",
               "After the tournament the {team} signed a new midfielder.",
               "The referee showed a red card after a rough tackle.",
               "Training this week focused on sprints, passing drills and set pieces.",
               "The season ends with a derby against the {team}.",
               "The captain lifted the trophy while the crowd cheered.",
               "An injury to the winger forced a change of tactics."],
    "cooking": ["Simmer the {dish} slowly with garlic, onions and fresh thyme.",
                "Whisk the eggs with sugar until the batter turns pale.",
                "Bake the {dish} in a hot oven until the crust is golden.",
                "Season the sauce with salt, pepper and a squeeze of lemon.",
                "Chop the herbs finely and fold them into the {dish}.",
                "Let the dough rest in the fridge for an hour before rolling it out.",
                "Roast the vegetables with olive oil and a pinch of cumin.",
                "Serve the {dish} warm with crusty bread and butter.",
                "Stir the risotto often and add the stock one ladle at a time.",
                "A splash of vinegar brightens a rich stew."],
    "space": ["The {probe} probe entered orbit around the distant planet.",
              "Astronomers measured the light curve of a pulsing star.",
              "The telescope captured a spiral galaxy millions of light years away.",
              "Engineers fired the thrusters to correct the {probe} trajectory.",
              "The rocket launched at dawn carrying a weather satellite.",
              "Scientists found water ice inside craters near the lunar pole.",
              "The astronauts repaired a solar panel during a long spacewalk.",
              "Data from the {probe} mission revealed a thick nitrogen atmosphere.",
              "A comet with a bright tail passed close to the sun.",
              "The space station crew grew lettuce in microgravity."],
    "finance": ["Shares of {firm} fell after the quarterly earnings report.",
                "The central bank raised interest rates to fight inflation.",
                "Investors moved money into bonds as markets turned volatile.",
                "{firm} announced a dividend and a share buyback program.",
                "The bond yield curve inverted for the first time in years.",
                "Analysts cut their revenue forecast for {firm}.",
                "Mortgage rates climbed while housing sales slowed.",
                "The stock index closed at a record high on strong tech earnings.",
                "Currency traders watched the dollar weaken against the euro.",
                "The company raised capital through a new bond issue."],
}
NAMES = {"team": ["Rovers", "United", "Wanderers", "City", "Athletic", "Rangers", "Albion", "Harriers"],
         "dish": ["stew", "pie", "tart", "curry", "casserole", "soup", "gratin", "loaf"],
         "probe": ["Voyager", "Cassini", "Juno", "Horizon", "Pioneer", "Galileo", "Rosetta", "Dawn"],
         "firm": ["Acme Corp", "Globex", "Initech", "Umbrella Inc", "Hooli", "Vandelay", "Stark Ltd", "Wayne Co"]}


def main(n_per_class: int = 80, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows, seen = [], set()
    for label, pool in POOLS.items():
        made = 0
        while made < n_per_class:
            picks = tuple(sorted(rng.sample(range(len(pool)), rng.choice([3, 4]))))
            fill = {k: rng.choice(v) for k, v in NAMES.items()}
            if (label, picks) in seen:  # a repeated sentence set would be a near duplicate
                continue
            seen.add((label, picks))
            rng_order = list(picks)
            rng.shuffle(rng_order)
            rows.append({"text": " ".join(pool[i].format(**fill) for i in rng_order), "label": label})
            made += 1
    rng.shuffle(rows)
    out = Path(__file__).with_name("topics.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} documents to {out}")


if __name__ == "__main__":
    main()
