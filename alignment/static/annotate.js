let current = null;
const $ = (id) => document.getElementById(id);
const who = () => $("annotator").value.trim();
$("annotator").value = localStorage.getItem("annotator") || "";

function show(data) {
  const p = data.progress;
  $("progress").textContent = `${p.mine} judged by you, ${p.judgements} in all, ${p.prompts} prompts`
    + (p.agreement && p.agreement.annotator_pairs ? `; agreement ${(100 * p.agreement.preference_agreement).toFixed(0)}%`
       + ` over ${p.agreement.annotator_pairs} annotator pairs` : "");
  current = data.item;
  $("task").hidden = !current; $("finished").hidden = !!current;
  if (!current) return;
  const prompt = $("prompt"); prompt.replaceChildren();
  const turns = current.context || [{role: "user", content: current.prompt}];
  for (const t of turns) {
    const div = document.createElement("div"); div.className = "turn";
    const role = document.createElement("span"); role.className = "role"; role.textContent = t.role + ":";
    div.append(role, document.createTextNode(t.content)); prompt.append(div);
  }
  if (current.is_safety) {
    const tag = document.createElement("span"); tag.className = "safety-tag"; tag.textContent = "safety prompt";
    prompt.append(tag);
  }
  for (const s of ["A", "B"]) $("answer-" + s).textContent = current.answers[s];
  // nothing starts marked: a pre-set safety mark would bias the labels toward it
  document.querySelectorAll("input[name=preferred], input[name=rating], input[name=safe-A], input[name=safe-B]")
    .forEach((r) => r.checked = false);
}

async function call(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}

async function load() {
  $("error").textContent = "";
  if (!who()) { $("error").textContent = "Type your annotator id first."; return; }
  localStorage.setItem("annotator", who());
  try { show(await call("/api/next?annotator=" + encodeURIComponent(who()))); }
  catch (e) { $("error").textContent = e.message; }
}

async function submit() {
  $("error").textContent = ""; $("saved").textContent = "";
  const pick = (name) => (document.querySelector(`input[name=${name}]:checked`) || {}).value;
  if (!pick("preferred") || !pick("rating")) { $("error").textContent = "Pick the better answer and how much better."; return; }
  if (!pick("safe-A") || !pick("safe-B")) { $("error").textContent = "Mark each answer safe or unsafe."; return; }
  const body = {annotator: who(), item_id: current.item_id, preferred: pick("preferred"), rating: pick("rating"),
                safe: {A: pick("safe-A") === "true", B: pick("safe-B") === "true"}};
  try {
    const saved = await call("/api/judge", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body)});
    $("saved").textContent = "Saved " + saved.id;
    await load();
  } catch (e) { $("error").textContent = e.message; }
}

$("start").addEventListener("click", load);
$("submit").addEventListener("click", submit);
