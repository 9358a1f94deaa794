// Small progressive enhancements; every page works without JavaScript.
document.addEventListener("change", (event) => {
  if (event.target.matches("select[data-autosubmit]")) event.target.form.submit();
});
document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});
document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const text = document.querySelector(button.dataset.copy)?.textContent ?? "";
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and copy";
  }
});
// Reserve form: a reserved term lasts its months, so the duration in hours does not apply: hidden
// (and not sent) while a term is chosen.
function syncTerm(select) {
  const hours = select.form?.elements.duration_hours;
  if (hours) hours.disabled = select.value !== "";
  const field = select.form?.querySelector("[data-duration-field]");
  if (field) field.hidden = select.value !== "";
}
document.addEventListener("change", (event) => {
  if (event.target.matches("select[data-term-select]")) syncTerm(event.target);
});
document.querySelectorAll("select[data-term-select]").forEach(syncTerm);
document.addEventListener("click", (event) => {
  if (event.target.closest("[data-print]")) window.print();
});
// Deploy form: pinned sites apply to pinned placement only, so they are hidden (and not sent) otherwise.
function syncPlacement(select) {
  const sites = select.form?.elements.pinned_sites;
  if (sites) sites.disabled = select.value !== "pinned";
  const field = select.form?.querySelector("[data-pinned-field]");
  if (field) field.hidden = select.value !== "pinned";
}
document.addEventListener("change", (event) => {
  if (event.target.matches("select[data-placement-select]")) syncPlacement(event.target);
});
document.querySelectorAll("select[data-placement-select]").forEach(syncPlacement);
