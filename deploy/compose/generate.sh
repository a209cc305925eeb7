#!/bin/sh
# Produces JSON transaction records to wallet.transactions, keyed by player (so a player's records
# stay in order in one partition): RATE records a second, forever. About 1 in 50 is deliberately
# invalid (a currency that is no ISO 4217 code) and 1 in 50 repeats an earlier transaction id, so
# the dashboard shows dead letters and duplicates next to deliveries.
set -eu
RATE="${RATE:-20}"
BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
TOPIC="${TOPIC:-wallet.transactions}"
awk -v rate="$RATE" 'BEGIN {
  srand();
  n = 0;
  while (1) {
    "date +%s" | getline now; close("date +%s");
    for (i = 0; i < rate; i++) {
      n++;
      player = "p" int(rand() * 200);
      r = rand();
      tx = "tx-" now "-" n;
      if (r < 0.02 && n > 1) tx = "tx-" last_tx;                    # a duplicate
      else last_tx = now "-" n;
      ccy = (rand() < 0.02) ? "EURO" : "EUR";                       # 2% invalid
      ip = "198.51.100." int(rand() * 250 + 1);
      amount = sprintf("%.2f", rand() * 100 + 1);
      if (r < 0.4) {
        printf "%s|{\"type\":\"deposit\",\"player_id\":\"%s\",\"tx_id\":\"%s\",\"amount\":%s,\"currency\":\"%s\",\"ts\":%d,\"click_id\":\"clk-%s\",\"ip\":\"%s\"}\n", player, player, tx, amount, ccy, now, player, ip;
      } else if (r < 0.9) {
        win = (rand() < 0.45);
        res = win ? sprintf("%.2f", amount * 1.5) : sprintf("-%s", amount);
        printf "%s|{\"type\":\"bet\",\"player_id\":\"%s\",\"tx_id\":\"%s\",\"amount\":%s,\"currency\":\"%s\",\"ts\":%d,\"bet_result\":\"%s\",\"bet_result_amount\":%s}\n", player, player, tx, amount, ccy, now, (win ? "win" : "loss"), res;
      } else {
        printf "%s|{\"type\":\"withdraw\",\"player_id\":\"%s\",\"tx_id\":\"%s\",\"amount\":%s,\"currency\":\"%s\",\"ts\":%d}\n", player, player, tx, amount, ccy, now;
      }
    }
    fflush();
    system("sleep 1");
  }
}' | /opt/kafka/bin/kafka-console-producer.sh --bootstrap-server "$BOOTSTRAP" --topic "$TOPIC" \
      --property parse.key=true --property key.separator='|'
